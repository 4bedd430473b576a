"""TraceHistory: the run's depth traces, kept in an append-only JSONL file so checkpoints stay
small.

Each probe's ``DepthTrace`` is one line of ``spinal_traces.jsonl`` in the run's log dir, tagged
with the run's identity and a *segment* number: ``{"run": ..., "segment": k, "trace": {...}}``.
A segment is what one process appended: a fresh start is segment 0, and every resume starts a new
one. A checkpoint holds only the run, the segment, how many of its lines belong to the run at
that checkpoint and their sha256 (a few hundred bytes, however long the run).

Nothing is ever cut from the file. On resume the checkpoint's lines are found by run and segment
in the resuming run's own file (else, read-only, in the file the checkpoint names, e.g. the
previous version folder of a versioned logger), checked against the hash, and copied into a new
segment of the run's own file, where the resumed run goes on. An interrupted segment's later
lines stay in the file, superseded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spinal_callback.outputs.event_log import ends_with_newline_or_is_empty
from spinal_callback.outputs.sink_guard import SinkGuard
from spinal_callback.probe.trace import DepthTrace

logger = logging.getLogger("spinal_callback")
FILE_STEM = "spinal_traces"
"""Trace files are ``spinal_traces*.jsonl``; a checkpoint naming another file is not read."""


class TraceHistory:
    """The traces of the current probe, in step order, and their file.

    Args:
        path: the JSONL file (``None``: memory only until ``open``; ``state_dict`` then holds
            the traces inline).
        run_id: the run's identity, written into every line.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, run_id: str = "") -> None:
        self.path = Path(path) if path is not None else None
        self.run_id = run_id
        self.segment = 0
        self.traces: list[DepthTrace] = []
        self._lines = 0
        self._since_restart = 0
        """Lines written for the traces in memory: fewer than them means some stayed inline."""
        self._digest = hashlib.sha256()
        self._guard = SinkGuard(
            f"writing the trace history {self.path or ''}".rstrip(),
            "traces stay in memory and a checkpoint holds them inline",
        )
        self._restored: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.traces)

    def __iter__(self) -> Iterator[DepthTrace]:
        return iter(self.traces)

    def open(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` from now on (the run's own file); after ``load_state_dict``, find
        the checkpoint's traces and copy them into a new segment of it."""
        self.path = Path(path)
        self._guard.what = f"writing the trace history {self.path}"
        restored, self._restored = self._restored, None
        if restored is None:
            return
        lines = _find_segment(self.path, restored) or _find_elsewhere(self.path, restored)
        self.segment = max(_segments_of(self.path, self.run_id), default=-1) + 1
        if lines is None:
            logger.warning(
                "spinal-callback: the traces of the checkpoint (run %s, segment %s) are not in "
                "%s, or changed since it was saved; the heatmap restarts at the resume step",
                self.run_id,
                restored.get("segment"),
                self.path,
            )
            return
        start = int(restored.get("from_line", 0))
        for line in lines[start:]:
            self.append(DepthTrace.from_dict(json.loads(line)["trace"]))

    def append(self, trace: DepthTrace) -> None:
        """Keep ``trace`` and append it to the file (an ``OSError`` is logged once; the trace
        stays in memory)."""
        self.traces.append(trace)
        if self.path is None:
            return
        record = {"run": self.run_id, "segment": self.segment, "trace": trace.to_dict()}
        line = (json.dumps(record, allow_nan=True) + "\n").encode("utf-8")
        path = self.path
        if self._guard.run(lambda: _append_line(path, line)):
            self._lines += 1
            self._since_restart += 1
            self._digest.update(line)

    def restart(self) -> None:
        """Forget the traces in memory (a new probe: old traces are not comparable); the file
        keeps them."""
        self.traces = []
        self._since_restart = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"file", "run", "segment", "count", "sha256", "from_line"}`` when the file holds
        every trace of the current segment, else the traces inline."""
        if self.path is None or self._guard.failing or self._since_restart < len(self.traces):
            return {"traces": [trace.to_dict() for trace in self.traces]}
        return {
            "file": str(self.path),
            "run": self.run_id,
            "segment": self.segment,
            "count": self._lines,
            "sha256": self._digest.hexdigest(),
            "from_line": self._lines - len(self.traces),
        }

    def load_state_dict(self, state: dict[str, Any] | list[Any]) -> None:
        """Restore ``state_dict``'s entry (a list is the inline form of older versions). A file
        entry is found when ``open`` names the run's own file; until then nothing is read."""
        if isinstance(state, list) or "traces" in state:
            records = state if isinstance(state, list) else state["traces"]
            self.traces = [DepthTrace.from_dict(record) for record in records]
            return
        self.traces = []
        self._since_restart = 0
        self._restored = dict(state)
        if self.path is not None:
            self.open(self.path)


def _append_line(path: Path, line: bytes) -> None:
    """Append ``line``; after a torn last line (a killed writer), on a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists() or ends_with_newline_or_is_empty(path)
    with open(path, "ab") as file:
        file.write(line if fresh else b"\n" + line)


def _find_segment(path: Path, state: dict[str, Any]) -> list[bytes] | None:
    """The checkpoint's lines (as a list of raw trace lines in the current format) in ``path``,
    or ``None`` when they are not there whole and unchanged. A checkpoint of an older version
    (no run: plain trace lines, the first ``count`` of the file) is read in its own format."""
    count, expected = int(state["count"]), state["sha256"]
    if not path.is_file():
        return None
    run, segment = state.get("run"), state.get("segment")
    lines: list[bytes] = []
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for line in file:
            if len(lines) == count or not line.endswith(b"\n"):
                break
            if run is None:
                digest.update(line)
                try:
                    lines.append(json.dumps({"trace": json.loads(line)}).encode("utf-8"))
                except ValueError:
                    return None
                continue
            record = _record(line)
            if record is not None and (record.get("run"), record.get("segment")) == (run, segment):
                digest.update(line)
                lines.append(line)
    if len(lines) < count or digest.hexdigest() != expected:
        return None
    return lines


def _find_elsewhere(own: Path, state: dict[str, Any]) -> list[bytes] | None:
    """The checkpoint's lines in the file it names, read only, when that is another regular
    file named like a trace file (``spinal_traces*.jsonl``); never written."""
    named = Path(str(state.get("file", "")))
    if not named.name.startswith(FILE_STEM) or named.suffix != ".jsonl":
        return None
    try:
        if named.resolve() == own.resolve() or not named.is_file():
            return None
    except OSError:
        return None
    return _find_segment(named, state)


def _segments_of(path: Path, run_id: str) -> list[int]:
    """The segment numbers of ``run_id`` already in ``path``."""
    if not path.is_file():
        return []
    segments = []
    with open(path, "rb") as file:
        for line in file:
            record = _record(line)
            if record is not None and record.get("run") == run_id:
                segment = record.get("segment")
                if isinstance(segment, int):
                    segments.append(segment)
    return segments


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "trace" in record else None


def runs_in(path: Path) -> set[str]:
    """The run identities with lines in the trace file ``path`` (older, untagged lines count as
    the run ``""``)."""
    if not path.is_file():
        return set()
    runs = set()
    with open(path, "rb") as file:
        for line in file:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                runs.add(str(record.get("run", "")) if "trace" in record else "")
    return runs
