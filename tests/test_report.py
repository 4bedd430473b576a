"""The report's PNGs are drawn on their own Agg canvas: the user's matplotlib backend and pyplot
are left as they were, and the image has the figure's size."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pytest
import torch
from matplotlib.image import imread

from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.probe.trace import DepthTrace
from spinal_callback.tools.localize import Localization, LowRankRecovery
from spinal_callback.tools.report import plot_depth_paths, plot_localization

PNG_SHAPE = (462, 1210, 4)
"""11 x 4.2 inches at 110 dpi, RGBA."""
NOT_AGG = "svg"
"""A backend other than Agg that any matplotlib has, headless."""


def depth_trace(step: int) -> DepthTrace:
    layers = [4, 5, 6]
    return DepthTrace(
        step=step,
        layers=layers,
        num_blocks=7,
        contraction=torch.tensor([1.0, 1.5, 2.0]) + step,
        transport=torch.tensor([0.2, 0.3]),
        contraction_status=torch.zeros(len(layers), dtype=torch.int8),
        summary={name: 0.0 for name in RAMP_SUMMARY_NAMES},
        measure="hellinger",
        model_fingerprint="m" * 16,
        probe_fingerprint="p" * 16,
    )


def localization() -> Localization:
    return Localization(
        layers=[0, 1, 2],
        pairs=8,
        margin_base=0.1,
        margin_tuned=1.1,
        effect=[0.1, 0.6, 0.9],
        effect_ci=[(0.0, 0.2), (0.5, 0.7), (0.8, 1.0)],
        gain=[0.1, 0.5, 0.3],
        gain_ci=[(0.0, 0.2), (0.4, 0.6), (0.2, 0.4)],
        ranking=[1, 2, 0],
        distance=[0.1, 0.2, 0.3],
        sparse=None,
        low_rank=[LowRankRecovery(1, [1, 2, 4], [0.5, 0.8, 0.95], [0.4, 0.7, 0.9])],
    )


PLOTS: dict[str, Callable[[Path], Path]] = {
    "depth_paths": lambda path: plot_depth_paths({"a": depth_trace(0), "b": depth_trace(4)}, path),
    "localization": lambda path: plot_localization(localization(), path),
}


@pytest.mark.parametrize("plot", sorted(PLOTS))
def test_plotting_leaves_the_users_matplotlib_backend_as_it_was(
    plot: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(matplotlib.rcParams, "backend", NOT_AGG)
    assert matplotlib.get_backend() == NOT_AGG
    PLOTS[plot](tmp_path / "plot.png")
    assert matplotlib.get_backend() == NOT_AGG


@pytest.mark.parametrize("plot", sorted(PLOTS))
def test_plotting_writes_a_png_of_the_figures_size_creating_its_folder(
    plot: str, tmp_path: Path
) -> None:
    path = tmp_path / "new" / "plot.png"
    assert PLOTS[plot](path) == path
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert imread(path).shape == PNG_SHAPE


def test_plotting_never_imports_pyplot(tmp_path: Path) -> None:
    """In a fresh interpreter, as importing pyplot sets up a backend and its figure manager."""
    script = textwrap.dedent(
        f"""
        import sys
        from tests.test_report import PLOTS

        for name, plot in PLOTS.items():
            plot({str(tmp_path)!r} + "/" + name + ".png")
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        """
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, timeout=120)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{name}.png" for name in PLOTS]
