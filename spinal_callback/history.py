"""TraceHistory: the run's depth traces, kept in a JSONL file so checkpoints stay small.

Each probe's ``DepthTrace`` is one line of ``spinal_traces.jsonl`` beside the event log. A
checkpoint holds only the file's path, how many lines belong to the run at that checkpoint and
their sha256 (a few hundred bytes, however long the run), so ``trainer_state.json`` does not grow
with every probe. On resume the first ``count`` lines are read back and checked; lines written
after the checkpoint by an interrupted run are cut off (new file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spinal_callback.trace import DepthTrace

logger = logging.getLogger("spinal_callback")


class TraceHistory:
    """The traces of the current probe, in step order, and their file.

    Args:
        path: the JSONL file (``None``: memory only; ``state_dict`` then holds the traces).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.traces: list[DepthTrace] = []
        self._lines = 0
        self._digest = hashlib.sha256()
        self._file_failed = False

    def __len__(self) -> int:
        return len(self.traces)

    def __iter__(self) -> Iterator[DepthTrace]:
        return iter(self.traces)

    def append(self, trace: DepthTrace) -> None:
        """Keep ``trace`` and append it to the file (an ``OSError`` is logged once; the trace
        stays in memory)."""
        self.traces.append(trace)
        line = (json.dumps(trace.to_dict(), allow_nan=True) + "\n").encode("utf-8")
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as file:
                file.write(line)
        except OSError as error:
            if not self._file_failed:
                logger.error(
                    "spinal-callback: cannot write the trace history %s (%s); traces stay in "
                    "memory and a checkpoint holds them inline",
                    self.path,
                    error,
                )
            self._file_failed = True
            return
        if self._file_failed:
            logger.warning("spinal-callback: the trace history %s is writable again", self.path)
        self._file_failed = False
        self._lines += 1
        self._digest.update(line)

    def restart(self) -> None:
        """Forget the traces in memory (a new probe: old traces are not comparable); the file
        keeps them, and checkpoints keep pointing at its lines."""
        self.traces = []

    def state_dict(self) -> dict[str, Any]:
        """``{"file", "count", "sha256", "from_line"}`` when the file holds every trace, else the
        traces inline."""
        if self.path is None or self._file_failed or self._lines < len(self.traces):
            return {"traces": [trace.to_dict() for trace in self.traces]}
        return {
            "file": str(self.path),
            "count": self._lines,
            "sha256": self._digest.hexdigest(),
            "from_line": self._lines - len(self.traces),
        }

    def load_state_dict(self, state: dict[str, Any] | list[Any]) -> None:
        """Restore ``state_dict``'s entry (a list is the inline form of older versions).

        The file is cut back to the checkpoint's ``count`` lines; if it is missing or its lines
        do not match the stored sha256, the history restarts empty, with a warning.
        """
        if isinstance(state, list) or "traces" in state:
            records = state if isinstance(state, list) else state["traces"]
            self.traces = [DepthTrace.from_dict(record) for record in records]
            return
        path, count = Path(state["file"]), int(state["count"])
        lines = _read_lines(path, count)
        digest = hashlib.sha256()
        for line in lines:
            digest.update(line)
        if len(lines) < count or digest.hexdigest() != state["sha256"]:
            logger.warning(
                "spinal-callback: the trace history %s is missing or changed since the "
                "checkpoint; the heatmap restarts at the resume step",
                path,
            )
            self.path, self.traces, self._lines, self._digest = path, [], 0, hashlib.sha256()
            _replace_with(path, [])
            return
        _replace_with(path, lines)
        self.path, self._lines, self._digest = path, count, digest
        start = int(state.get("from_line", 0))
        self.traces = [DepthTrace.from_dict(json.loads(line)) for line in lines[start:]]


def _read_lines(path: Path, count: int) -> list[bytes]:
    if not path.is_file():
        return []
    with open(path, "rb") as file:
        lines: list[bytes] = []
        for line in file:
            if len(lines) == count or not line.endswith(b"\n"):
                break
            lines.append(line)
    return lines


def _replace_with(path: Path, lines: list[bytes]) -> None:
    """Write ``lines`` to a new file and rename it over ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as file:
            file.writelines(lines)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(path)
    except OSError as error:
        logger.error("spinal-callback: cannot rewrite the trace history %s (%s)", path, error)
