"""Measuring: the depth-trace scores, the trace format, and the probe that takes them from a
model (model plumbing, the logit lens, the drift)."""

from spinal_callback.probe.batch import ProbeBatch
from spinal_callback.probe.spinal_probe import SpinalProbe, late_band

__all__ = ["ProbeBatch", "SpinalProbe", "late_band"]
