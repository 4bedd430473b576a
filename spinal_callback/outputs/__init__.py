"""Showing and recording: TensorBoard, the event log, the trace history, the run's files, and the
guard that keeps a failing sink from failing training."""

from spinal_callback.outputs.sinks import AlertHook, Outputs

__all__ = ["AlertHook", "Outputs"]
