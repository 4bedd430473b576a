"""RunFiles: the files of one run, whose they are, and what a resume marks.

At train begin the run locks its log dir and its event log (``ownership.RunLock``), puts its
trace history and drift reference in its own log dir (never a path a checkpoint names), says so
when another run wrote there before, and, on resume, appends a ``resumed`` record that
supersedes the interrupted segment's records (the event log is never cut). The reference trace
goes beside the history as ``spinal_reference.json`` (replaced whenever the reference is traced
again), for readers of the log dir such as the SPINAL tab.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spinal_callback import distributed
from spinal_callback.atomic import replace_atomically
from spinal_callback.monitor.alerts import Alert
from spinal_callback.outputs.event_log import RESUMED
from spinal_callback.outputs.history import TraceHistory, runs_in
from spinal_callback.outputs.ownership import RunLock, lock_or_warn
from spinal_callback.outputs.sink_guard import SinkGuard
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.probe.drift import DriftMeter
from spinal_callback.probe.trace import DepthTrace

logger = logging.getLogger("spinal_callback")
REFERENCE_STEM = "spinal_reference"
"""The reference trace is ``spinal_reference.json`` (``.rank<k>`` before ``.json`` on rank k)."""


class RunFiles:
    """This run's locks and files, and the folder of the checkpoint it resumed from.

    Args:
        run_id: the run's identity (``Runner.run_id``).
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._locks: list[RunLock] = []
        self.previous: dict[str, str] = {}
        """The restored checkpoint's log dir and event log, named in the ``resumed`` record
        when the run goes on elsewhere (a versioned logger's next version)."""
        self._reference_path: Path | None = None
        self._reference_guard = SinkGuard(
            "writing the reference trace", "the SPINAL tab draws no reference for this run"
        )

    def lock(self, outputs: Outputs, directory: Path | None) -> None:
        """Lock the log dir and the event log for this run.

        Raises:
            RunConflictError: another live process writes there.
        """
        suffix = rank_suffix()
        paths = [] if directory is None else [directory / f".spinal{suffix}.lock"]
        log = None if outputs.event_log is None else outputs.event_log.path
        if log is not None and (log.is_file() or not log.exists()):
            # A device (``/dev/null``, ``/dev/full``) is no file of a run's: nothing to lock.
            paths.append(log.with_name(f".{log.name}.lock"))
        for path in paths:
            lock = lock_or_warn(path, self.run_id)
            if lock is not None:
                self._locks.append(lock)
        if self._locks:
            logger.info(
                "spinal-callback: run %s writes %s; a second run writing there is refused "
                "until this one ends",
                self.run_id,
                " and ".join(sorted({str(lock.path.parent) for lock in self._locks})),
            )

    def open(
        self,
        directory: Path,
        step: int,
        history: TraceHistory,
        drift: DriftMeter | None,
        outputs: Outputs,
    ) -> None:
        """The trace history and the drift reference in ``directory``; at a fresh start, say
        so when other runs wrote there."""
        suffix = rank_suffix()
        traces = directory / f"spinal_traces{suffix}.jsonl"
        others = sorted(runs_in(traces) - {self.run_id}) if step == 0 else []
        if others:
            outputs.note(
                step,
                f"{directory} already holds the traces of another run ({', '.join(others)}); "
                f"this run ({self.run_id}) appends after them and its event-log records carry "
                "its run id, but TensorBoard will chart both runs in the same place: give each "
                "run its own log_dir",
            )
        history.open(traces)
        self._reference_path = directory / f"{REFERENCE_STEM}{suffix}.json"
        if drift is not None:
            drift.attach(directory / f"spinal_drift_reference.{self.run_id}{suffix}.safetensors")

    def save_reference(self, reference: DepthTrace, event_log: Path | None = None) -> None:
        """Replace the log dir's reference file with ``reference`` and the event log's path
        (nothing before ``open``); a failure costs the file, never the run."""
        path = self._reference_path
        if path is None:
            return
        log = None if event_log is None else str(event_log.resolve())
        record = {"run": self.run_id, "event_log": log, "trace": reference.to_dict()}
        line = json.dumps(record, allow_nan=True)
        self._reference_guard.run(
            lambda: replace_atomically(path, lambda file: file.write_text(line, encoding="utf-8"))
        )

    def mark_resume(self, step: int, directory: Path | None, outputs: Outputs) -> None:
        """A ``resumed`` record that supersedes this run's records after ``step`` (the event
        log keeps them), and hidden TensorBoard events after ``step``. A checkpoint written in
        another folder (a versioned logger's previous version, or the run a folder was copied
        from) is named, never written to."""
        record = resumed_record(step, outputs.records_after(step))
        previous = self.previous.get("directory")
        moved = previous is not None and directory is not None
        if moved and Path(str(previous)).resolve() != Path(str(directory)).resolve():
            record = dataclasses.replace(
                record,
                message=f"{record.message}. The checkpoint was written in {previous}: this "
                f"folder takes the run on from step {step}, and what that folder holds after "
                "it is superseded (it is left as it is)",
            )
        outputs.record(record)
        outputs.hide_after(step)

    def release(self) -> None:
        """Unlock (``Runner.end`` does it; a run that died keeps its locks only until its
        process exits)."""
        for lock in self._locks:
            lock.release()
        self._locks = []

    def state_dict(self, history: TraceHistory, outputs: Outputs) -> dict[str, Any]:
        return {
            "directory": None if history.path is None else str(history.path.parent),
            "event_log": None if outputs.event_log is None else str(outputs.event_log.path),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.previous = {
            key: str(state[key]) for key in ("directory", "event_log") if state.get(key)
        }


def rank_suffix() -> str:
    """``""`` on rank 0, ``.rank<k>`` on rank ``k``: each rank writes its own files."""
    rank = distributed.rank()
    return "" if rank == 0 else f".rank{rank}"


def resumed_record(step: int, superseded: Sequence[Mapping[str, Any]]) -> Alert:
    """The record a resume from ``step`` appends: what it supersedes, one entry a record."""
    if superseded:
        listed = "; ".join(
            f"{record.get('level')} {record.get('rule')} at step {record.get('step')}"
            for record in superseded
        )
        what = (
            f"it supersedes {len(superseded)} record(s) of the interrupted segment after step "
            f"{step} (kept above in the event log): {listed}"
        )
    else:
        what = f"no record after step {step} is superseded"
    return Alert(
        step=step,
        level="info",
        rule=RESUMED,
        metric="spinal/resume",
        value=float(step),
        threshold=float("nan"),
        message=f"the run resumed from its checkpoint of step {step}; {what}",
    )
